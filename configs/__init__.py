"""ml_collections ``get_config()`` files; see ``default.py`` for every field."""

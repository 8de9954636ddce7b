"""The training system's error messages: one line naming the cause and the fix."""

import errno
import os
from pathlib import Path

from anodev2_jax import errors


def test_write_errors_name_the_os_error():
    assert errors.os_error_text(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device (ENOSPC)"
    tensorstore = ValueError(
        'OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/w/checkpoints/8.orbax-checkpoint-tmp/": '
        "Failed to write 3631484 bytes to file 4: No space left on device [os_error_code='28']"
    )
    assert errors.os_error_text(tensorstore) == "No space left on device (ENOSPC)"
    error = errors.WriteError("summary.json", OSError(errno.EDQUOT, "Disk quota exceeded"), Path("/w/checkpoints/8"))
    assert str(error) == (
        "writing summary.json failed: Disk quota exceeded (EDQUOT); free disk space or fix the permissions there, "
        "then rerun the same command: it resumes from the last complete checkpoint /w/checkpoints/8"
    )


def test_config_error_is_one_line():
    assert str(errors.ConfigError("a\n  b\tc")) == "a b c"
    assert isinstance(errors.ConfigError("x"), ValueError)

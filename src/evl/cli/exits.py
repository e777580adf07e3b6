"""How every command ends: its exit statuses, and the errors a user can fix, which ``main`` reports in one
line on stderr (``EXIT_INPUT_ERROR``) instead of a traceback."""

from __future__ import annotations

from evl.engine.checkpoint import CheckpointError
from evl.recipes import RecipeError
from evl.video.decode import VideoDecodeError
from evl.video.lists import ListFileError
from evl.weights import WeightFormatError

# Exit statuses, the same for every command: success; a mistake in what the user passed (one line on
# stderr says which); interrupted (128 + SIGINT, as shells report it). Anything else is a bug: a traceback.
EXIT_OK, EXIT_INPUT_ERROR, EXIT_INTERRUPTED = 0, 2, 130

USER_ERRORS = (
    RecipeError,
    ListFileError,
    VideoDecodeError,
    WeightFormatError,
    CheckpointError,
    FileNotFoundError,
    ValueError,
    FloatingPointError,  # a non-finite loss: the message says where the last good checkpoint is
)

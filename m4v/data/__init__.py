"""Training data (paper D.1): the synthetic Moving Shapes set and real text-video folders/CSV/JSONL."""

from m4v.data.moving_shapes import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    HELDOUT_PAIRS,
    MovingShapes,
    canonical_caption,
    captions,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render,
    render_frames,
)
from m4v.data.video_folder import (
    VideoTextDataset,
    check_num_frames,
    collate,
    frame_indices,
    mixed_batches,
    mixed_indices,
)

__all__ = [
    "BACKGROUND_RGB",
    "COLOUR_RGB",
    "HELDOUT_PAIRS",
    "MovingShapes",
    "VideoTextDataset",
    "canonical_caption",
    "captions",
    "check_num_frames",
    "collate",
    "frame_indices",
    "heldout_prompts",
    "is_heldout",
    "mixed_batches",
    "mixed_indices",
    "parse_caption",
    "render",
    "render_frames",
]

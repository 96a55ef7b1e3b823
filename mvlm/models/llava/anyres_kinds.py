"""The batch keys of any-resolution LLaVA media (see :mod:`mvlm.models.llava.anyres` for the
layout); torch-free, so the families' ``__init__`` can name them at registration."""
from __future__ import annotations

from mvlm.models.registry import MediaKind

# Tiles of every image as rows; ``image_grid_thw`` = (tiles, 1, 1) per image says which rows
# are whose; ``image_sizes`` = (height, width) of the original image (HF's key).
ANYRES_IMAGE = MediaKind("image", token_attr="image_token_id", features_key="pixel_values",
                         grid_key="image_grid_thw", extra_keys=("image_sizes",),
                         dtypes={"image_grid_thw": "long", "image_sizes": "long"},
                         tokens_follow_grid=False)
# Frames of every video as rows; ``video_grid_thw`` = (frames, 1, 1) per video.
FRAMES_VIDEO = MediaKind("video", token_attr="video_token_id",
                         features_key="pixel_values_videos", grid_key="video_grid_thw",
                         dtypes={"video_grid_thw": "long"}, tokens_follow_grid=False)

"""A procedurally generated multi-round reasoning world for training and testing SegLLM.

Scenes of shapes and composite objects (with parts) on varied backgrounds, each with a
conversation whose later rounds refer to earlier rounds' targets ("instance k"), so a model
needs its mask memory to answer. See :class:`World` (in-memory samples) and
:func:`write_split` / :func:`generate` (COCO annotations + conversations.jsonl on disk).
"""

from segllm.data.world.dataset import (
    DEFAULT_ANSWERS,
    GENERATOR_VERSION,
    SPLITS,
    Sample,
    World,
    WorldConfig,
    build_conversation,
    generate,
    heldout_pairs,
    resolvability_share,
    write_split,
)
from segllm.data.world.language import (
    FAMILIES,
    Head,
    Margins,
    Query,
    default_margins,
    is_unique,
    needs_memory,
    resolve,
    text_resolvable,
)
from segllm.data.world.scene import (
    CATEGORIES,
    COLOURS,
    COMPOSITES,
    PARTS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    WorldObject,
    render_scene,
)

__all__ = [
    "CATEGORIES", "COLOURS", "COMPOSITES", "DEFAULT_ANSWERS", "FAMILIES", "GENERATOR_VERSION",
    "PARTS", "SHAPES", "SIZES", "SPLITS", "TEXTURES", "Head", "Margins", "Query", "Sample",
    "Scene", "World", "WorldConfig", "WorldObject", "build_conversation", "default_margins",
    "generate", "heldout_pairs", "is_unique", "needs_memory", "render_scene", "resolvability_share",
    "resolve", "text_resolvable", "write_split",
]

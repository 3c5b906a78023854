"""Search spaces: schema (what may vary) and codec (genome <-> recipe)."""

from evomerge.space.codec import PSCodec, group_names
from evomerge.space.schema import Bounds, ParameterSpace, SearchSpace

__all__ = ["Bounds", "PSCodec", "ParameterSpace", "SearchSpace", "group_names"]

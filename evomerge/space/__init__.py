"""Search spaces (schema) and genome <-> recipe codecs."""

from evomerge.space.codec import PSCodec, group_names
from evomerge.space.dfs_codec import DFSCodec
from evomerge.space.schema import Bounds, DataFlowSpace, ParameterSpace, PSDonor, SearchSpace, load_space_data

__all__ = ["Bounds", "DFSCodec", "DataFlowSpace", "PSCodec", "PSDonor", "ParameterSpace", "SearchSpace",
           "group_names", "load_space_data"]

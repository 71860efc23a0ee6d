"""The word count's agents, as they were once one module: the words
(words.py), the mapper (kv_mapper.py, its packet flow in kv_flow.py), the
reducer (kv_reducer.py, its state in kv_merge.py) and what they exchange
(kv_messages.py). Kept so old imports still work; new code imports those."""
from .kv_mapper import MapStats, run_mapper  # noqa: F401
from .kv_merge import ReducerState, ReduceSummary, summary_dict  # noqa: F401
from .kv_messages import CollisionError, KVError  # noqa: F401
from .kv_reducer import ReduceResult, run_reducer  # noqa: F401
from .words import CHUNK_BYTES, SPLITS, WordSource, count_words, map_file, read_chunks, tokenize  # noqa: F401

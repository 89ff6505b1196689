"""The retrieval database format (memory-mapped), nearest-neighbour search (ScaNN, exact, BM25) and
the per-entry H-space cache (`hspace_cache`, imported on its own: it needs JAX)."""

from imagerag_jax.retrieval.database import Database
from imagerag_jax.retrieval.database import DatabaseError
from imagerag_jax.retrieval.database import DatabaseSpec
from imagerag_jax.retrieval.database import DatabaseWriter
from imagerag_jax.retrieval.database import open_database
from imagerag_jax.retrieval.index import exact_search
from imagerag_jax.retrieval.index import Index
from imagerag_jax.retrieval.index import recall_at_k

"""Video-corpus moment retrieval (VCMR): every query ranked against every (video, moment) of a collection.

metrics.py (pure functions), candidates.py (a split's videos -> projected candidates), index.py (on disk),
search.py (query -> moments across videos), protocol.py (`wsra-dist evaluate --corpus`).

`load_index(INDEX).search("a man delivers a package")` is the Python API of `wsra-dist search`."""

from .search import Moment, Searcher, load_index

__all__ = ["Moment", "Searcher", "load_index"]

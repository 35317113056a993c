"""Video-corpus moment retrieval (VCMR): every query ranked against every (video, moment) of a collection.

metrics.py (pure functions), candidates.py (a split's videos -> projected candidates), index.py (on disk),
search.py (query -> moments across videos), protocol.py (`wsra-dist evaluate --corpus`)."""

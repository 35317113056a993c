"""Raw video -> snippet features (`wsra-dist features`, `ground --video`).

decode.py    PyAV: open, duration, frames with their presentation times (decoded in a helper thread)
timing.py    which frames go into which snippet or chunk (pure numpy: the time rules live here)
extract.py   frame -> vector: the model-free `pixels` extractor and any local Hugging Face image model
pipeline.py  one video: decode -> select -> extract -> pool -> (T, D) or (6, D)
layouts.py   the official file layouts, written so that a killed or failed run leaves nothing half-written
run.py       many videos across processes: resumable, progress, failures, the features manifest
"""

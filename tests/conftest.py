import os

# Keep XLA to the two CI cores and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

"""GTSRB MLOps pipeline components: plain-Python cores plus thin KFP wrappers."""

"""hpcstage: stage Hugging Face models and datasets for offline HPC jobs."""
__version__ = "0.1.0"

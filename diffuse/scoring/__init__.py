"""What diffuse eval computes, apart from its command: the Evaluation of one job (its samples or generated images,
their features, the reference and the likelihood model: `evaluation.py`) and the metrics over them (`metrics.py`)."""

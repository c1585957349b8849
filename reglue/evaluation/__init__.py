"""The end of the workflow: samples from a checkpoint (``generate``) and their scores against a
reference batch as the ADM evaluator defines them (Inception features, FID, sFID, IS, precision,
recall), plus FD_DINOv2."""

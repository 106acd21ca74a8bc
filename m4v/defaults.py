"""Sampling defaults shared by the pipeline and the command line (light: the CLI reads them before importing torch)."""

SQG_START_FRAME = 8  # paper E.3: self-quality guidance from the 8th latent frame on

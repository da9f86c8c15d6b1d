"""Paths a run takes only when its config asks: the vLLM engine, offline (Lightning) OPD, real data sets."""

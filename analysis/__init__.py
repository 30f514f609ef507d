"""geocap.analysis: attention analyses over records (entropy, thematic clusters, proximity,
grounding). Built on geocap.kernels and the record format only, so they apply to any model's
records. The analyses themselves are not written yet (the dumps-and-analyses issue)."""

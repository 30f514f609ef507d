"""The colour of each attention kind, as the analysis report draws it.

``analysis/plotting.py`` (``plot_entropy``) plots encoder self-, decoder self- and
cross-attention in that order with matplotlib's default colour cycle, so they are its first
three colours (tab:blue, tab:orange, tab:green). The viewer takes them from here (through
``data/manifest.js``) for its entropy plot and grid and for its shading, so one kind has one
colour in the report and on every page of the viewer. Kept in this small module so that it can
become the one constant both read.
"""
ATTENTION_COLOURS = {"encoder_self": "#1f77b4", "decoder_self": "#ff7f0e", "cross": "#2ca02c"}

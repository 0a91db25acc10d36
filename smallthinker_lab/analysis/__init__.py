"""Analysis on top of the instruments: figures (plots), tables, the memory-limit explorer (widgets) and the report.

Imports flow one way: analysis -> instruments -> engine -> kernels -> model. Modules load on first use (they pull in
matplotlib, ipywidgets and pandas' styling): ``from smallthinker_lab.analysis import plots``.
"""

"""Analysis of trained runs: word–object correspondences, the concept codebook, sweeps, training curves.

Every ``selfalign analyze ...`` sub-command writes PNG figures and one section of an HTML report
(``report.py``); the section records the command that produced it. Figures use matplotlib's Agg backend.
"""

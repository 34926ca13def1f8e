"""fMoE's expert maps (arXiv 2502.05370): stored routing of past tokens, matched to predict the next layers."""

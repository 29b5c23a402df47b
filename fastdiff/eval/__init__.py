"""Judging samples: exact Gaussian-mixture networks with exact samples and likelihoods (``exact``), sample
distances and statistical checks (``metrics``), and the digits judge (``quality``)."""

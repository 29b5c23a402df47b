"""Solvers beyond the fixed-step loop: the probability-flow ODE's drift and an adaptive RK45 (``ode``), the eager
samplers that are not one coefficient program (``eager``: rk45, pc, consistency; ``corrector``: the Langevin
corrector), exact likelihoods (``likelihood``), inversion and decoding (``inversion``) and latent interpolation
(``interpolate``). They take any :class:`~fastdiff.runtime.pipeline_like.PipelineLike`."""

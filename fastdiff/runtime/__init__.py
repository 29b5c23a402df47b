"""The loop every entry point shares: the one wrapper of the fused step op (``step``), the plan and run of a
coefficient program (``loop``), whole-loop CUDA graphs (``graphs``), classifier-free guidance (``guidance``), x0
limits (``x0_clip``), input and output checks (``checks``) and the pipeline protocol the solvers take
(``pipeline_like``)."""

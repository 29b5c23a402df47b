"""The demos behind ``fastdiff demo``: the embedded digits network against diffusers' schedulers (``digits``) and
every sampler on an exact 2-D mixture (``mixture``)."""

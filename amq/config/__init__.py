"""The one reader of the composed Hydra config.

`compose.py` turns the composed config into the objects the stages take (model, data, proxy bank,
metric, search space and loop settings, finalize stage) and maps the errors the domain modules
raise about their own arguments to the setting the user wrote. `check.py` refuses unknown keys and
wrongly typed values before anything runs.
"""

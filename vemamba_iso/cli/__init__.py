"""The ``vemamba_iso_*`` commands, one module each, on one shared base (:mod:`.common`, :mod:`.outputs`).

| command | module |
|---|---|
| ``vemamba_iso_train`` | :mod:`.train` |
| ``vemamba_iso_predict`` | :mod:`.predict` |
| ``vemamba_iso_evaluate`` | :mod:`.evaluate` |
| ``vemamba_iso_degrade`` | :mod:`.degrade` |
| ``vemamba_iso_interpolate`` | :mod:`.interpolate` |
| ``vemamba_iso_to_nnunet`` | :mod:`.to_nnunet` |

Each module has ``build_parser()``, ``run(args)`` (the work; raises on failure) and ``main(argv=None)``
(parse, run, turn every failure into one ``error: ...`` line and exit code 2). A new command is a module
with those three functions and a line in ``pyproject.toml``'s ``[project.scripts]``.
"""

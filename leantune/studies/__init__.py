"""Studies: recipes that train and evaluate through the public API, as any user would.

`unit_tests`: do generated unit tests parse, pass, and call the function under test; its smallest
form is the main job's before/after table (`leantune train` on the embedded default).
"""

"""Studies: recipes that train and evaluate through the public API, as any user would.

`unit_tests`: do generated unit tests parse, pass, and call the function under test; its smallest
form is the main job's before/after table (`leantune train` on the embedded default).
`metrics` (with `mutants`): per generated test, line and branch coverage of the focal function and
mutation score, both measured in the sandbox, and CodeBLEU against the reference test.
`stats`: per method, Wilson and bootstrap intervals, McNemar's exact test between two methods,
cost-efficiency.
"""

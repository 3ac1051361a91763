"""The user documentation as the tool carries it: README.md, docs/*.md and the benches' records
(bench/results/*.md) found on disk (pages.py), rendered to HTML for `edge-t2t serve`'s /docs and
the bundle (pages.py, web.py), and the CLI reference generated from the argparse parsers
(cli_reference.py). Nothing here is needed to index or search.
"""

"""What is kept and shown: the SQLite results store, the reports (table, Markdown, CSV, JSON, HTML
with plots) and the pre-release size audit against budgets.

May import `deploykit.bench` and everything below it.
"""

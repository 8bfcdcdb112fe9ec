"""Analysis of the experiments' result JSON files: loading and statistics (results.py), figures
(figures.py), tables (table.py) and the teacher x student grid runner (grid.py)."""

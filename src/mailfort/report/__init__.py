"""What the audit and the lab share to tell their results.

A layer below both (it imports neither): language catalogues loaded by one rule
(:mod:`.catalogue`), widths of terminal text with CJK in it (:mod:`.text`), and one
self-contained HTML page (:mod:`.page`). Each report keeps only what it says.
"""

"""What Lacuna can fetch and has registered: parcellations (:mod:`.parcellations`),
TemplateFlow transforms (:mod:`.templates`, applied by :mod:`.transforms`), the
connectome registry (:mod:`.connectomes`) and the connectome downloaders
(:mod:`.fetching`). Nothing here imports the analyses, BIDS, workflows or the CLI."""

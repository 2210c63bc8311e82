"""Network and download plumbing: one HTTP client with one retry policy
(:mod:`.http`), resumable downloads (:mod:`.download`), safe archive extraction
(:mod:`.archives`), API keys (:mod:`.credentials`), free-space checks (:mod:`.disk`) and
markers of completed steps (:mod:`.steps`)."""

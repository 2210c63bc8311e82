"""Fetching the normative connectomes: the catalogue of sources (:mod:`.sources`), the
fetch records (:mod:`.records`), one run's folder, lock and shared steps (:mod:`.run`),
the server clients (:mod:`.dataverse`, :mod:`.figshare`, :mod:`.github`), the
pipelines (:mod:`.gsp1000`, :mod:`.tractograms`), dispatch by name (:mod:`.dispatch`)
and what is fetched already (:mod:`.status`)."""

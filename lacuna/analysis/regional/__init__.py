"""Regional damage and parcel summaries of maps (sparse parcel operators)."""

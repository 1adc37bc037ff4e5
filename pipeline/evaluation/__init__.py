"""What a trained head measures: metrics, the reference fits on truth hits, predictions files, plots."""

"""The Zarr embedding cache: schema, writer, block loader, inspection."""

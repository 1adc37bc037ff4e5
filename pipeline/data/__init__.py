"""The ATLAS-muon HDF5 layer: layout constants and scaling, the synthetic spectrometer, the reader, batching."""

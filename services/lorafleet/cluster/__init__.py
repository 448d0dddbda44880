"""Running the mesh on one machine as local processes."""

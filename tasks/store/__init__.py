"""The output folder and who may write it: storage, layout, plan, parts, markers, leases."""

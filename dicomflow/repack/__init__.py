"""Repack received DICOM into the pypx layout and write pypx's log JSON (rx-repack's job).

Kept free of imports: ``python -m dicomflow.repack`` imports this package first, and the
per-file command must start fast. Import from the modules: `repacker.repack_file`,
`tree.repack_tree`, `cli.main`.
"""

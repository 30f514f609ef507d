"""A static attention viewer for dumps: ``build_site(records, out_dir, ...)`` writes
it, ``geocap view DUMP --out DIR`` (:mod:`geocap.cli.view`) is its command line."""
from geocap.view.site import SiteSummary, build_site

__all__ = ["SiteSummary", "build_site"]

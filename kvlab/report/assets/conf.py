"""Sphinx configuration of the rendered site (copied next to the executed notebooks by kvlab.report).

The notebooks arrive executed, so Sphinx only renders them. Everything a page loads is local: no
require.js or widget manager (widget outputs such as progress bars are dropped before rendering), fonts
and icons from the theme's own files. MathJax would come from a CDN on a page with math; the notebooks
have none, and the site check would flag it.
"""

project = "kvlab"
html_title = "kvlab"
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
# `[text](02_elimination.ipynb#the-section)` links resolve to a heading of the rendered page
myst_heading_anchors = 3

# Notebooks are executed by papermill before Sphinx runs; never re-execute here.
nb_execution_mode = "off"
# No widget manager from a CDN: kvlab.report drops widget outputs (progress bars) before rendering.
nb_ipywidgets_js = {}

html_theme = "sphinx_book_theme"
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "use_download_button": True,  # the executed .ipynb of each page
    "use_fullscreen_button": False,
    "show_toc_level": 2,
    # the landing page is short and its summary table wide: no "contents" column there
    "secondary_sidebar_items": {"**": ["page-toc"], "index": []},
    "footer_content_items": [],  # no "By <author>" line: the landing page says where a render came from
}
html_static_path = ["_static"]
html_css_files = ["kvlab.css"]
html_js_files = ["kvlab.js"]
html_copy_source = True  # `_sources/NN.ipynb`: what the download button offers
html_show_sourcelink = False
html_use_index = False
html_domain_indices = False
html_last_updated_fmt = None

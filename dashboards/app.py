"""The maskmix dashboard: `maskmix dashboard` runs `streamlit run dashboards/app.py` (dashboards/serve.py)."""

import sys
from pathlib import Path

try:  # an editable install made before dashboards/ existed does not map it: fall back to the checkout
    import dashboards  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="maskmix", layout="wide")
HERE = Path(__file__).resolve().parent
PAGES = [
    st.Page(str(HERE / "pages" / "mixtures.py"), title="Mixtures", url_path="mixtures", default=True),
    st.Page(str(HERE / "pages" / "data.py"), title="Data", url_path="data"),
    st.Page(str(HERE / "pages" / "training.py"), title="Training", url_path="training"),
]
st.navigation(PAGES).run()

from django.contrib.auth.decorators import login_required
from django.urls import path
from django.views.generic import RedirectView

# The HTMX pages arrive with the web-pages issue; until then the browsable API is the UI.
urlpatterns = [
    path("", login_required(RedirectView.as_view(url="/api/runs/")), name="home"),
]

"""The web inspector: a page per run (timeline, steps, what each changed, contexts at any step),
live while the run goes on, and the JSON API under ``/api/`` it is built on.

    settings.py   RUNCTX_WEB_* (where it listens, its credentials)
    security.py   authentication, the CSRF token of POSTs, security headers
    live.py       server-sent events fed by the store's watch channel, one read per change for all pages
    api.py        the JSON API (the shapes of the CLI's ``--json``), with its OpenAPI description
    pages.py      the HTML pages (Jinja2 templates; the script and styles are served from ``static/``)
    app.py        the application that puts them together (`create_app`)

Started by ``runctx web``. Nothing is loaded from elsewhere: the page works offline.
"""

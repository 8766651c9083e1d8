"""The reply link's pages: a citizen, maybe on a cheap phone with a weak signal, taps a link and sees
two buttons — nothing to log in to, nothing loaded from elsewhere, every text in Bahasa Indonesia and
English.

The pages are strict: a Content-Security-Policy that allows only their own inline style (by hash)
and a form posting back to the same address, no framing, no referrer (the address carries the
token), nothing cached (a shared phone's history must not answer for someone later).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from jinja2 import Environment

STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:2rem auto;padding:0 1rem;line-height:1.4}"
    "button{display:block;width:100%;font-size:1.3rem;padding:1rem;margin:1rem 0;border:0;border-radius:.5rem;color:#fff}"
    ".safe{background:#1b7f3b}.help{background:#b3261e}p.small{color:#555;font-size:.9rem}"
)
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_ENV: Final = Environment(autoescape=True)

_LAYOUT: Final = """<!doctype html>
<html lang="id"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>{% block body %}{% endblock %}</body></html>"""

_ASK: Final = _ENV.from_string(_LAYOUT.replace("{% block body %}{% endblock %}", """
<h1>Apakah Anda aman? / Are you safe?</h1>
<p>{{ crisis_title }}</p>
<form method="post" action="">
<button class="safe" type="submit" name="status" value="safe">Saya aman / I am safe</button>
<button class="help" type="submit" name="status" value="need_help">Saya butuh bantuan / I need help</button>
</form>
<p class="small">Jawaban Anda dikirim ke pusat krisis. / Your answer goes to the crisis centre.</p>"""))

_THANKS: Final = _ENV.from_string(_LAYOUT.replace("{% block body %}{% endblock %}", """
{% if status == "safe" %}<h1>Terima kasih, tetap aman. / Thank you, stay safe.</h1>
<p>Kami mencatat bahwa Anda aman. / We recorded that you are safe.</p>
{% else %}<h1>Bantuan sedang diatur. / Help is being arranged.</h1>
<p>Kedutaan telah diberi tahu dan akan menghubungi Anda. / The embassy has been told and will contact you.</p>
{% endif %}<p class="small">Anda dapat menjawab lagi jika keadaan berubah. / You can answer again if things change.</p>"""))

_PROBLEM: Final = _ENV.from_string(_LAYOUT.replace("{% block body %}{% endblock %}", """
<h1>Jawaban tidak dapat diterima / The answer cannot be taken</h1>
<p>{{ reason }}</p>
<p class="small">Balas pesan SMS dengan AMAN atau TOLONG, atau hubungi kedutaan. /
Reply to the SMS with SAFE or HELP, or call the embassy.</p>"""))


def ask_page(crisis_title: str = "") -> str:
    return _ASK.render(title="Apakah Anda aman? / Are you safe?", style=STYLE, crisis_title=crisis_title)


def thanks_page(status: str) -> str:
    return _THANKS.render(title="Terima kasih / Thank you", style=STYLE, status=status)


def problem_page(reason: str) -> str:
    return _PROBLEM.render(title="Tidak dapat diterima / Cannot be taken", style=STYLE, reason=reason)

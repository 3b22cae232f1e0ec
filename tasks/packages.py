"""What a build mines, pinned so that two builds of one size read the same code.

Every wheel is pinned by version *and* sha256: pip verifies the hash on
download (``--require-hashes``) and the build re-checks cached files, so a
re-published or tampered artifact fails the build instead of silently changing
the data. All pins are pure-Python (``*-none-any``) wheels that install on
Python 3.11. Packages that vendor or back-port other mined code (pip,
setuptools, mock, tomli, typing-extensions, ...) are left out on purpose: their
near-copies would leak functions across the group split.

The online split (:mod:`tasks.online`) has pins of its own, in no other table:
a learner is trained online on its lists, so their code and queries must be
new to the splits and guard sets, or what it learns there would show up again,
flattered, on test.
"""

from __future__ import annotations

from dataclasses import dataclass

from codistill.config import Size


@dataclass(frozen=True)
class Pin:
    """One pinned wheel: project name, exact version and the wheel's sha256."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


# ~30 stdlib modules with rich docstrings: the `small` size mines only these (no downloads).
SMALL_STDLIB: tuple[str, ...] = (
    "ast", "base64", "bdb", "calendar", "configparser", "datetime", "difflib", "enum",
    "fractions", "ftplib", "functools", "heapq", "http", "imaplib", "inspect", "ipaddress",
    "json", "mailbox", "pathlib", "random", "shutil", "smtplib", "statistics", "tarfile",
    "threading", "traceback", "typing", "urllib", "uuid", "zipfile",
)

# Well-documented, medium-sized packages: the `demo` size mines the stdlib plus these.
DEMO_PACKAGES: tuple[str, ...] = (
    "requests", "click", "attrs", "jinja2", "rich", "more-itertools", "werkzeug", "boltons",
)

# The `full` size mines the stdlib plus every pin below, in this order (dedupe keeps the first).
# One wheel a line: name, version, sha256 of the pure-Python wheel.
_PIN_TABLE = """
requests 2.34.2 2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0
click 8.5.1 8bb5376d2006950386f8c6427613334a2acadc5f559cb80e638d00b4df957e37
attrs 26.1.0 c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309
jinja2 3.1.6 85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67
rich 15.0.0 33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb
more-itertools 11.2.1 35a7377edd1dd6608dcb2cdf534ded55ea32d49448875ad042cd3f879fb1ded0
werkzeug 3.1.9 6392e50c78460ba618e5b21f08a71f59c99ce99cdc6cf6e3dd7e6ccca8754fab
boltons 26.2.0 41942cbce440211bbcf2487ccdc356964ad674f95a01068b8a0dd7a1d1fed036
urllib3 2.8.0 0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3
idna 3.20 ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c
packaging 26.3 d7193f7c8e4e93f444fde0262bf90af30e16fa0ad0ad44cb553c87339b23cd1c
pyparsing 3.3.3 ece8c00a69cf01b45d0b1dedabb469c90d8caf996d4fda40f147627a122849a4
python-dateutil 4.0.0 a5e246f79eb80475e691bf93862cead98decd8a498cf53ba0516fcdc0f50dc1c
pytz 2026.6 7fed3fee8fd6bd4a2b7b75a8d56021d0624127bf69bd5691f115db929ac570b3
toolz 1.2.0 890f820b1cb8152785aaf9386d8707770110809035800985ca65cb24ce1120ef
sortedcontainers 2.4.0 a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0
networkx 3.6.1 d47fbf302e7d9cbbb9e2555a0d267983d2aa476bac30e90dfbe5669bd57f3762
alembic 1.20.1 9970712cfb81ea26c8658d378aaa5b8f6ff9146e5bb111d70497c164016cf598
mako 1.4.3 723296007c870bfd6b3f0c3230dba7198096e5269297ebf5e4eff9e7ffa39d4f
flask 3.1.3 f4bcbefc124291925f1a26446da31a5178f9483862233b23c0c96a20701f670c
itsdangerous 2.2.0 c6242fc49e35958c8b15141343aa660db5fc54d4f13a1db01a3f5891b98700ef
blinker 1.9.0 ba0efaa9080b619ff2f3459d1d500c57bddea4a6b424b60a91141db6fd2f08bc
bottle 0.13.4 045684fbd2764eac9cdeb824861d1551d113e8b683d8d26e296898d3dd99a12e
httpx 0.28.1 d909fcccc110f8c7faf814ca82a9a4d816bc5a6dbfea25d6591d6985b8ba59ad
httpcore 1.0.9 2d400746a40668fc9dec9810239072b40b4484b640a8c38fd654a024c7a1bf55
anyio 4.16.0 c66ae634e0b8228396b801741beb3294326d4b6102f7bba4041c0dfb58c29026
starlette 1.10.0 478c0ab3b4ced6e82719849c118fa406f0278a3499c1a898cd15cd31bdc38ce4
fastapi 0.163.2 825a8fdd18d7bfcb1b86735e9805c59b7400d55c4060d3df5331b62ae452f004
pydantic 2.14.3 3f7b347782ab7e4cf4c798496ae3a82787d9f21ec12676a9c564355eeef8daa8
marshmallow 4.4.0 03a882ff2eabb9a4e24b433c2949f359ef4d172a12fdc14cde10375fd55328b4
cattrs 26.2.1 a12aaa3453dc8f633a815293179f08b7421ed18d2575c459c3c736f840beac24
jsonschema 4.26.0 d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
referencing 0.37.0 381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231
tomlkit 0.15.2 05562412163a3037b94497385fb7f9204c637bc605af7a48199e41cf2272f437
docutils 0.23 25d013af9bf23bc1c7b2b093dff4208166c53a94786c9e447808335ef1185fea
sphinx 9.0.4 5bebc595a5e943ea248b99c13814c1c5e10b3ece718976824ffa7959ff95fffb
pygments 2.21.0 2363c69b61c4a97c838da3b130dcd6468f4848992b21a82f2a63ec34377137d9
markdown 3.11.3 e1a31a112232504d753e5c01bb8c2de90d3f0ba986b063e10770cf7695b09e73
mistune 3.4.0 d03cec4c8620f21517a996d82d14f3b59c30d79bda2cc6c56bd32b839f18ce6b
markdown-it-py 4.3.0 7aa1511a46c39138de78d9eba92ce47e63124d8003fc98b3a351909e04239efa
bleach 6.4.0 4b6b6a54fff2e69a3dde9d21cc6301220bee3c3cb792187d11403fd795031081
html5lib 1.1 0d78f8fde1c230e99fe37986a60526d7049ed4bf8a9fadbad5f00e22e58e041d
beautifulsoup4 4.15.0 d6f88de62e1d4e38ecb1077eb9724cd0eff29d2a08ca16a401e9b9e93f117cf9
soupsieve 2.10 8596eb8967d744174820280fa62b4542a2e955bfaccca73ed8a13c6eb8e9b502
cssselect 1.6.0 6df6eab9b264c0f2092a6e386b33610e1684a25e27925ecebe25e3d97cbf3525
feedparser 6.0.14 e35e3f760151b0c3b22cac9684155cae186a233e16c49bcbc6c49e91e3131137
arrow 1.4.0 749f0769958ebdc79c173ff0b0670d59051a535fa26e8eba02953dc19eb43205
humanize 4.17.0 02d0899527760efe18011944f882df4970943b4cdff7b5a0ba7fed43a576ef98
babel 2.18.0 e2b422b277c2b9a9630c1d7903c2a00d0830c409c59ac8cae9081c92f1aeba35
tabulate 0.10.0 f0b0622e567335c8fabaaa659f1b33bcb6ddfe2e496071b743aa113f8774f2d3
prettytable 3.18.0 b3346e0e6f79180833aebaac088ae926340586cf6d7d991b9eb125b65f72313a
tqdm 4.70.1 c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73
typer 0.29.1 00dbc549c13428bec1be55fe1f4d0fb8c6637a310e4f178ef14abe9534ee7b58
fire 0.7.1 e43fd8a5033a9001e7e2973bab96070694b9f12f2e0ecf96d4683971b5ab1882
prompt-toolkit 3.0.53 01c0891d7f9237d5e339f7d3e42cdae80b7534abb1c7c0e3352efba6231492f2
cmd2 4.3.1 cb432f9e0cae011422c2b96a6b9ce87686dad3777d50a30d3ac3d9afb84b53a2
pexpect 4.9.0 7236d1e080e4936be2dc3e326cec0af72acf9212a7e1d060210e70a47e253523
ptyprocess 0.7.0 4b41f3967fce3af57cc7e94b888626c18bf37a083e3651ca8feeb66d492fef35
filelock 4.2.11 020e229e4bb9d410fc799c07ddf45fa217cba970278f40b30751d94f309b69e2
platformdirs 4.14.5 8e778c6fa421516f4d3369449f8df3b0e1b72c0e0005fe88e3ec772d0a14e750
distlib 0.4.4 cf09d55b1e85a89576b036aeb71550bfd68320f3f21761ca329eadadad918638
build 1.6.1 ecd351a4be9d35a9eaaba244a7687143c9c7d4aea6ac964e7e7ddab20cbcf4e7
pyproject-hooks 1.3.3 5fc53fdac9f7bd63fbcdc868fb5f90b4784d78a53a3d3388cd738b807441a20b
hatchling 1.33.0 415290b84f464d2884303fca8974d38e7b85579069fab02a15db0828fbb1446d
pluggy 1.7.0 7dd7b0d8832ba3cb632c306926ded123429211b83641b35dc5c41ad2d34f9bec
pytest 9.2.0 07acdcf88ec174f907dc01af70bf52d49b014bbab03faeeade31c96b18c2e588
tox 4.67.13 4d6fa08dbe5e841f2abfee1dd4f5cdf31af30d68a3d78b85a7bf57eced5f3c6c
nox 2026.10.20 7aff12bb01471f5b087ada34cf0dbe452b02d840593f2e2afecc4bf6e6d6cd3f
responses 0.26.3 74474f799334ac4f37d93b6437ecc3bb1bb5c77a8d31780a338643be2dce0af8
requests-toolbelt 1.0.0 cccfdd665f0a24fcf4726e690f65639d272bb0637b9b92dfd91a5568ccf6bd06
requests-oauthlib 2.0.0 7dd8a5c40426b779b0868c404bdef9768deccf22749cde15852df527e6269b36
oauthlib 4.0.1 498a298876e996301950a5b053d12c31628bb7b895db03666430c69ce182eb61
pyjwt 2.15.1 42d59d631f7768a1028a64c7ff581a9bf7519804daf91fc5b6c56e30eec5e193
paramiko 5.1.0 d9fe6d67a9d0bbf3eb85b051d26ab850b678c02d060f32915b944e5ca6d0d9e1
fabric 3.2.3 ce61917f4f398018337ce279b357650a3a74baecf3fdd53a5839013944af965e
invoke 3.0.3 f11327165e5cbb89b2ad1d88d3292b5113332c43b8553b494da435d6ec6f5053
sh 2.4.0 98eba32eeb5ecdd310668737d7461e668afc42b273550d0bc198a1c5c2b1ab36
plumbum 2.0.2 a865771826c1d2cce0ca8b2a2c48aa0447ed7a518859e389a95f158e9c369547
schedule 1.2.2 5bef4a2a0183abf44046ae0d164cadcac21b1db011bdd8102e4a0c1e91e06a7d
apscheduler 3.11.3 bbeb2ec02d23d3c06a6c07ed7f0f3939ada6680eb121fae809a69bb42c537a30
celery 5.7.0 18310a9c919f9029e4735367484d93e6a25cdfd30afdc474622cc263d9b35f6e
kombu 5.7.0 dede73bff4c89175be382c4203d2f167cf7017c384396ec75c36a1b5678f1587
amqp 5.4.2 e6e756b15c89c86818b48a4947a424706238afbf67d457428d3269bc4590db9e
pika 1.4.4 48de960c97a93b55db06b8be4c53eb977c9c8a2754c57cdae9097abcbd70ce04
kafka-python 3.0.12 67add72052e3ad0c37ed9963ebe2b1696adc7f063c64eaf19862c21b69a64a18
boto3 1.44.5 70c3e0409794b29ec1900bcaff0695b73234a2d32ffaed35045b94caa26212a5
s3transfer 0.19.3 24eb7535804306355e31c952a90022bf5b2f9d760f9a11062c7493a217c08553
google-auth 2.62.2 e9bcdb0679b6a4369ac327c5c59f06d92f7b4cd2624e7100294c14632f55a36b
cachetools 8.0.0 5af562e5078f0086771a1e3832a9c3dbf5d336b6e2794a2c12a64680a4c9087d
rsa 4.9.1 68635866661c6836b8d39430f97a996acbd61bfa49406748ea243539fe239762
pyasn1 0.6.5 4017b0fce125096b8573b39c989fdb1a4b19cf761e683398184550fea0e66587
httplib2 0.32.1 82e7a6ab08fcb27879864ddf63dbb529fb032ca336c331cb1597d6dd8b47c92e
websocket-client 1.9.2 e1a673830a9c7bfa47b1cd3d5e4178f4c9651d80a4eab02c9c23a1c3ec6250ce
trio 0.35.0 9a062a029487c1bdbcc1b2543b729a0bde857ce478b1512c84f391f628e0c5c9
dnspython 2.9.2 af15f7d385a6ae2fb35a796fde2138004c8c42c7389090e2addc83e3b3340fd8
validators 0.36.0 c52ad00435e385b95fa4d6dd3081cb20c0660e7fd07b214523c8584dd2edba34
inflect 7.6.0 9fefad5c0c174d8a38f8c33d3033817e38fca8475f7f226c62efc39d46c83e8a
inflection 0.5.1 f38b2b640938a4f35ade69ac3d053042959b62a0f1076a5bbaa1b9526605a8a2
jsonpickle 4.1.4 c46024ba4acd8adb9a8b8485d074e141cbfacafe334c2aa982e5b32efabc2f0e
dill 0.4.1 1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d
cloudpickle 3.1.2 9acb47f6afd73f60dc1df93bb801b472f05ff42fa6c84167d25cb206be1fbf4a
joblib 1.6.0 3dbbf9f6e4b592a2357b854608e980fe6390d131d7a82f011a377ef2ebef7aba
typeguard 4.6.0 79878165bb86f2cf5d41d159a0ff1792a796cf496882d2fe1b1c6c7049b9cdd7
pyflakes 4.1.0 b2e05e6bac8e49b67be2a6ffa63422c60f7193fc72e8180255907b41ec997dc1
pycodestyle 2.15.0 12fd2f73c7b8ee8845a0431111df8faf4c1a07d6e64e2ee7f0c74014dab14181
flake8 7.5.0 637ea1a443a78ed6ee461725cdf71ca93bc5cde0abf25436dbebdc3880b4e078
autopep8 2.3.2 ce8ad498672c845a0c3de2629c15b635ec2b05ef8177a6e7c91c74f3e9b51128
pylint 4.1.4 b39fcc762ec4a7fe385d01b8e170fd996847297cdc0e3850bdda1435c74cfd95
astroid 4.3.4 2bcd0d02648a443a4b818c952c3550091989daefac3c12d3b83b2289482e0818
jedi 0.20.1 0fb16d86c4a4c73c37ba518c77419975e30fcc620658a8d14fbb5720cdd34142
parso 0.8.7 a8926eb2a1b915486941fdbd31e86a4baf88fe8c210f25f2f35ecec5b574ca1c
rope 1.15.0 1445f5c6eb3c2c6eda9f9532ed02513a09c1694bfee4a9291f7a86a990ac44a1
yapf 0.43.0 224faffbc39c428cb095818cf6ef5511fdab6f7430a10783fdfb292ccf2852ca
pydocstyle 6.3.0 118762d452a49d6b05e194ef344a55822987a462831ade91ec5c06fd2169d019
sqlparse 0.6.1 3be5a72d04c873d690d7c6dedd33d6fae2ef82759881ceec02fc2efd0cba564f
tinydb 4.9.0 111f1f680978a1b7c534d698dd1d76739ff31c74c27fd26a111140b51d8b35d6
openpyxl 3.1.5 5282c12b107bffeef825f4617dc029afaf41d0ea60823bbb665ef3079dc79de2
xlsxwriter 3.3.1 8e2c89e59d733fe59e112317218c64fbbc276d90a8c144ebd6f7fa15e7ab184a
pypdf 7.1.0 47cca6b24bdcf4c4d65b5f7b8b972535c61710a061261e737688777cfd9a7bfb
imageio 2.38.1 36d23eb7423d2fb63f637098758edb3d2df3687f7125e0a5ce8596572022dcf9
scrapy 2.19.0 44c1ad4b008f1976e946c75b2adce0e448cbfe470c584b1b59469abf270e8013
parsel 1.12.1 cf74e09857329bddc02c13ae239a9b46f410dc5bd1d05361c8c2643a1a5a7149
w3lib 2.5.0 136fd5edfe64b53b8579838e2a7e803495bbbe6b69ddfaeed3c29a794b44f6ba
gunicorn 27.0.1 378b26b9a38adcf4592f28828233c1716acc55e833ea06bf48719782efaa0d10
uvicorn 0.54.0 505bdb0f318731d45f1f712071fc781a8981f6847a31c902c9f5e652d4f67faf
waitress 3.0.2 c56d67fd6e87c2ee598b76abdd4e96cfad1f24cacdea5078d382b1f9d7b5ed2e
automat 25.4.16 04e9bce696a8d5671ee698005af6e5a9fa15354140a87f4870744604dcdd3ba1
hyperlink 21.0.0 e6b14c37ecb73e89c77d78cdb4c2cc8f3fb59a885c5b3f819ff4ed80f25af1b4
eventlet 0.41.3 839ed5711fff67034e46dedf4b41cf33f8378fca541e866621895fc186933e1d
jsonpointer 3.12 89f391335ee2719ae72149e1bf30a4d4c7c5d92f15a3f53faa8d20cc7c6c7f19
jsonpatch 1.47 c9ba6de59c481bf2be05041514ecb0d97f994aa645c4e00831805dbe2281811a
structlog 26.1.0 e081a26d6c373e6d201eca24eede26d8ffab07f88f477822e679183428d3d91e
loguru 0.7.3 31a33c10c8e1e10422bfd431aeb5d351c7cf7fa671e3c4df004162264b28220c
sentry-sdk 2.75.0 9a10e97de2cbd42ad7e4a6e02a0d5af19de9811eb02445077d41ba14c08e170c
prometheus-client 0.26.0 fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6
tenacity 9.2.1 9e56f17539296baab7beabb08b92f6ee3d7be92d8be72d763360677c2ad6580e
cachecontrol 0.14.4 b7ac014ff72ee199b5f8af1de29d60239954f223e948196fa3d84adaffc71d2b
diskcache 5.6.3 5e31b2d5fbad117cc363ebaf6b689474db18a1f6438bc82358b024abd4c2ca19
glom 25.12.0 b9f21e77f71a6576a43864e85066b8cc3f0f778d0d50961563f8981377a6dcb1
funcy 2.1 290794186530c944f7e444d2e28b98f33a55685f2bfb9b7a61dac564decab8f8
pydash 8.1.0 61df790f303288df7da3a766c3ca6ea5a8f3ec882b28712bac8d13573dbaba97
mpmath 1.4.1 dc4f0ea2304480d4a9a48a94c1020571558ade522b44a6912efac63a586e140f
patsy 1.0.3 d3dbebe8fd5f46e29912d030b63c6268647b59bf788a99e2af28a30234cf357c
threadpoolctl 3.8.0 f1b49c82704d50f13ffae019c727b0fa4f6791a58f48f06a09c45face1be66da
seaborn 0.13.2 636f8336facf092165e27924f223d3c62ca560b1f2bb5dff7ab7fad265361987
xarray 2026.9.0 fe349fa871628b1a0a5217af3fe1283a2862d5485156e6eda354fffb81c3bb7c
dask 2026.8.0 ccc0c83a189b0398602435189771d28dad7b5773b6089bb8dce14ae732dd782c
pint 0.25.3 27eb25143bd5de9fcc4d5a4b484f16faf6b4615aa93ece6b3373a8c1a3c1b97d
geopy 2.5.0 8ad8cc226b505ca4d272ae9a2eeba08b8a2c565fc9a04eaefc33ad49c32b51aa
psycopg 3.3.9 d2d7d04a1ce6dab4f5b27316bea3b52585cafa2f2d631e5b09dd69823f5c26f6
docker 7.2.0 a3f45fdeb9165e2d25d9a1d02ddf3bc70fb572cf5ebbf9b58558c22caf29b71f
gitpython 3.2.1 d66b0832aa8755c1a84892937282df0befb16c97e5a64aeebd68be9c5e323f53
ipython 9.18.1 997ce9140d374531a61069c70c0f9ef299d6dd3559ea0f94b8af589726e3c1d5
traitlets 5.16.1 f775618166caa0396c8e337099240f2bd3e5e917d203b2e6fbe21a58d3cb1f6b
nbformat 5.11.1 cc6698fa75f4fab8755ead786317815f13a6fee3b53311c0abb1a8b51d52f7ec
lark 1.3.1 c629b661023a014c37da873b4ff58a817398d12635d3bbb2c5a03be7fe5d1e12
pyserial 3.5 c4451db6ba391ca6ca299fb3ec7bae67a5c55dde170964c7a14ceefec02f2cf0
paho-mqtt 2.2.0 3243630f7c2b05f71d1de8c6f59865eb04d3a59ae8c866e92377faed6753db4d
zeep 4.3.3 5adfae35582848819f8bb97b6ea9f1a34a2d4851a539f830e14dbab09961dd18
multipledispatch 1.0.0 0c53cd8b077546da4e48869f49b13164bebafd0c2a5afceb6bb6a316e7fb46e4
pyopenssl 26.4.0 f0eb0cb2d581d3ad2b9c489468485e7f2ab6727d08401bcf9d824c3caddf3c1c
ecdsa 0.19.2 840f5dc5e375c68f36c1a7a5b9caad28f95daa65185c9253c0c08dd952bb7399
passlib 1.7.4 aa6bca462b8d8bda89c70b382f0c298a20b5560af6cbfa2dce410c0a2fb669f1
humanfriendly 10.0 1697e1a8a8f550fd43c2865cd84542fc175a61dcb779b6fee18cf6b6ccba1477
python-dotenv 1.2.4 42269a8a5b3fd54ffa6f3d84b18abed50064717576b4ecf03dc4a55d8aa04fdc
omegaconf 2.4.0 f141a664c777582405e3cc6e0545ecc79429e79f844995b1a6e71c35946a025c
transitions 0.9.3 02463248f2b668d86f66636b1e3c9e8de84d93e22915247f4e1aa9ee1cae28aa
simpy 4.1.2 43071f84b6512c9b4fcb33ef057f240ccb1d1f3b263f9b4f9229d072e310b372
markdown2 2.5.5 be798587e09d1f52d2e4d96a649c4b82a778c75f9929aad52a2c95747fa26941
docstring-parser 0.18.0 b3fcbed555c47d8479be0796ef7e19c2670d428d72e96da63f3a40122860374b
jsonpath-ng 1.16.0 c5e28ddd70ebcaeba9af3c2b880933fbfeb108b5e68c9edb84e1b57803091218
pyhamcrest 2.1.0 f6913d2f392e30e0375b3ecbd7aee79e5d1faa25d345c8f4ff597665dcac2587
texttable 1.7.2 a381e1ed30e4d4bd24cdacabe26463b7a570c0e964fc0b35d8d9276b2fcbe252
qrcode 8.2 16e64e0716c14960108e85d853062c9e8bba5ca8252c0b4d0231b9df4060ff4f
pydot 4.0.1 869c0efadd2708c0be1f916eb669f3d664ca684bc57ffb7ecc08e70d5e93fee6
graphviz 0.21 54f33de9f4f911d7e84e4191749cac8cc5653f815b06738c54db9a15ab8b1e42
numpydoc 1.11.0 493ad2ce0d8275ca5da484ec37dbdbbc1334c3a6968dffd10ec729b51753e15e
configobj 5.0.9 1ba10c5b6ee16229c79a05047aeda2b55eb4e80d7c7d8ecf17ec1ca600c79882
argcomplete 3.7.2 6029205678bdd9c1c728a155f5f9ecf5812393f969eef58807641a2bc2aa5b19
luigi 3.8.1 ea974b26157c327ae8f6a6f9e0ddaa09d868ce8a4010f7631c383614e0152318
rq 2.12.0 97e349a00e9f2a18962102b3dca156cb5ce315d3ef38145e24ba9cabd16a9361
huey 3.5.4 a3b68953fc62fbbbfe15cd6c48bef9d8072a267234c647121c31ec466e35e8e8
h2 4.4.1 0e25f1462b23c9cb82d9eb02e28bc706dac2a68cb457c6a0d74d63c8a2a5d0e6
hpack 4.2.0 858ac0b02280fa582b5080d68db0899c62a80375e0e5413a74970c5e518b6986
requests-mock 1.12.1 b1e37054004cdd5e56c84454cc7df12b25f90f382159087f4b6915aaeef39563
vcrpy 9.4.2 ae6644e018e0663d4afd7cb232e029b4557ffccac2473b9ad4717f135b010b75
authlib 1.9.6 96564699a43281b9e3473717a135407a1170bdc850ebe21313539d672c2a6682
wtforms 3.3.2 2fac992f39102d6268b06e05cdbdf37a7e9b9a4e103916d2dff1d09a080b531d
django 5.2.19 5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00
djangorestframework 3.18.3 8544bb674846731b1e3c9b309236ee1dc412905a0aa725be2ec193ca950a7d12
pyramid 2.1 0aa62604221f6a8ac6e77a0faa02a5b7a294d6675f15581d8d416dffe2ac98e7
voluptuous 0.16.0 ee342095263e1b5afbd4d418cb5adc92810eebfd07696bb033a261210df33db4
cerberus 1.3.8 46c029e3e2a4735408ed36bec14ef2cbf3e50d8ebe47fb34ee1e54b2da814df2
execnet 2.1.2 67fba928dd5a544b783f6056f449e5e3931a5c378b128bc18501f7ea79e296ec
asgiref 3.13.0 f9596a2434512686473d50f96ff6207fbba49ae1a785dfac614df4aeb085674d
pathspec 1.1.1 a00ce642f577bf7f473932318056212bc4f8bfdf53128c78bbd5af0b9b20b189
isodate 0.7.2 28009937d8031054830160fce6d409ed342816b543597cece116d966c6d99e15
rdflib 7.6.0 30c0a3ebf4c0e09215f066be7246794b6492e054e782d7ac2a34c9f70a15e0dd
sqlglot 30.30.0 06c4c212a7868c7dcff0fd0fda348dd3c5cbad40137b3083a70ecdfe22921cf9
pycparser 3.12 a076f3f489b39b43ed13563a1dafe42447445bec2e294154ec5c57fcdda4c85e
"""
PINS: tuple[Pin, ...] = tuple(Pin(*line.split()) for line in _PIN_TABLE.strip().splitlines())

_BY_NAME = {pin.name: pin for pin in PINS}

# Guard sets (tasks.guards) are mined from these wheels only. None of them is a training
# pin (not even at `full`), and none vendors a training package. One wheel a line; a
# package in the version guard has both releases pinned. sha256 checked with
# `pip download --no-deps NAME==VERSION` (twice, independently) and `sha256sum`.
_GUARD_PIN_TABLE = """
sympy 1.14.0 e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5
twisted 26.10.0 3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8
nltk 3.10.4 769ba5413f265b7d3e87cd163cc28efa01e29eeef8bb6080bc907949d9fcfb51
urwid 5.1.0 99b48fdf865100bf246e738a60d22fc965a4aa994e8744d17c5cbff9d7ccb35a
textual 8.2.8 267375fd402dc8d981457212efa71f0e3365fd17bba144ba9bb3ed7563cb374a
natsort 8.4.0 4732914fb471f56b5cce04d7bae6f164a592c7712e1c85f9ef585e197299521c
ftfy 6.3.1 7c70eb532015cd2f9adb53f101fb6c7945988d023a085d127d1573dc49dd0083
asttokens 3.0.2 9da13157f5b28becde0bd374fc677dcd3c290614264eff096f167c469cd9f933
pyglet 2.0.10 e10a1f1a6a2dcfbf23155913746ff6fbf8ea18c5ee813b6d0e79d273bb2b3c18
pyglet 2.1.19 5ba6e8cb0b5ac56a284e43ab411e2bbd504191c32a765abdbd6a6c4b7f1ca317
sqlfluff 3.0.0 362a70cbf3f8d72b0e8687c0c04e61286ed424fd6cc9d4a79b079cba9be62d4d
sqlfluff 4.5.0 471a9abcad8061e36b69f711a6d89393241e30f9d1e0869f79965c0ae2c889c7
deepdiff 6.7.1 58396bb7a863cbb4ed5193f548c56f18218060362311aa1dc36397b2f25108bd
deepdiff 9.1.0 80c0460e1993b04f6f0ca79abf25548b129fd218478c4ebb08f80560f5d10610
"""
GUARD_PINS: tuple[Pin, ...] = tuple(
    Pin(*line.split()) for line in _GUARD_PIN_TABLE.strip().splitlines()
)
# nl2code-prose at demo/full: the newest release of each of these.
GUARD_PROSE_PACKAGES: tuple[str, ...] = (
    "sympy", "twisted", "nltk", "urwid", "textual", "natsort", "ftfy", "asttokens",
)
# code2code-versions: (package, older release, newer release).
GUARD_VERSION_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("pyglet", "2.0.10", "2.1.19"), ("sqlfluff", "3.0.0", "4.5.0"), ("deepdiff", "6.7.1", "9.1.0"),
)
# nl2code-prose at `small` (no downloads): stdlib modules the small training splits do not mine.
SMALL_GUARD_STDLIB: tuple[str, ...] = (
    "aifc", "asyncio", "codecs", "fileinput", "mimetypes", "multiprocessing", "plistlib",
    "pstats", "socket", "sunau", "telnetlib", "textwrap", "turtle", "wave", "_pydecimal",
)

# The online split (tasks.online) at demo/full is mined from these wheels only. None is a
# training or guard pin at any size (so no other set mines them), and none vendors a
# training package; ~2,000 pairs between them, far above the 400 queries demo keeps.
# sha256 checked with `pip download --no-deps --only-binary=:all: NAME==VERSION` and
# `sha256sum`.
_ONLINE_PIN_TABLE = """
redis 8.1.0 a4fe1aac3d3b3cc791d4b3d5931c5a956045dc951ee74d1c913ee3ac4d2ee9fb
python-docx 1.2.0 3fd478f3250fbbbfd3b94fe1e985955737c145627498896a8a6bf81f4baf66c7
icalendar 7.3.2 f95ce4ff8f41d8ad9ca253a676ef40c672abd3774458d197c215055a0d805cc4
petl 1.7.30 99b7e9a66b68908146f0f590a4bb61a270572bbe33f33dbf5036a234e4fee2de
"""
ONLINE_PINS: tuple[Pin, ...] = tuple(
    Pin(*line.split()) for line in _ONLINE_PIN_TABLE.strip().splitlines()
)
# The online split at `small` (no downloads): stdlib modules that neither the small splits
# (SMALL_STDLIB) nor the small prose guard (SMALL_GUARD_STDLIB) mine; ~580 pairs.
SMALL_ONLINE_STDLIB: tuple[str, ...] = (
    "cmd", "collections", "contextlib", "dataclasses", "email", "gzip", "locale", "logging",
    "operator", "pydoc", "sched", "shlex", "subprocess", "tempfile", "xml",
)


def guard_pin(name: str, version: str) -> Pin:
    """The guard pin of ``name==version``."""
    for pin in GUARD_PINS:
        if (pin.name, pin.version) == (name, version):
            return pin
    raise KeyError(f"no guard pin {name}=={version}")


def pins_for(size: Size) -> tuple[Pin, ...]:
    """The wheels a build of ``size`` mines (none for ``small``)."""
    if size == "small":
        return ()
    if size == "demo":
        return tuple(_BY_NAME[name] for name in DEMO_PACKAGES)
    return PINS

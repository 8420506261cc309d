# Homebrew formula for AbstractGateway (Python-virtualenv style).
#
#   brew install --formula ./packaging/homebrew/abstractgateway.rb   # from a checkout (tap it for real use)
#   brew services start abstractgateway
#
# RELEASE: `url`/`sha256` below must point at this project's released sdist (built with
# `python -m build --sdist`, i.e. hatchling). Note that the PyPI name `abstractgateway` is
# taken by the upstream AbstractGateway project (0.15.x), so the sdist of this project cannot
# be fetched from PyPI under that name. The sha256 below is a placeholder.
#
# Resources: the runtime dependency closure of `abstractgateway` 0.1.0 (from
# `pip install . --dry-run --report` / a fresh `pip install .`): apsw, werkzeug, markupsafe,
# platformdirs, abstractruntime 0.4.25, abstractmemory, abstractsemantics, pyyaml.
# URLs are the PyPI sdists; sha256 sums were computed with `sha256sum` on the downloaded files.
class Abstractgateway < Formula
  include Language::Python::Virtualenv

  desc "Small, durable run gateway for AbstractRuntime workflows: one module, one SQLite file"
  homepage "https://pypi.org/project/AbstractRuntime/"
  url "https://example.invalid/abstractgateway-0.1.0.tar.gz" # RELEASE: the project's sdist
  sha256 "0000000000000000000000000000000000000000000000000000000000000000" # RELEASE: sha256sum of it
  license "MIT"

  depends_on "libyaml"
  depends_on "python@3.12"
  depends_on "sqlite"

  # apsw's sdist downloads the SQLite source from sqlite.org while it builds (its setup.apsw
  # says `fetch = True`). Homebrew builds may run without network: `install` below replaces
  # setup.apsw in the staged sdist so apsw builds against Homebrew's sqlite instead.
  # apsw 3.54.1.0 is made for SQLite 3.54.1; against an older SQLite it still builds but
  # functions newer than that library are missing (the gateway needs none of them).
  resource "apsw" do
    url "https://files.pythonhosted.org/packages/84/75/be84a7237ea1af8374c67ff7468053bff538e1591526805c6574b2efef4d/apsw-3.54.1.0.tar.gz"
    sha256 "d9fd64ed76dc0f3d2265d4aeedb74d678c2ac7dffbd4e8ba05bf9a87aa7c34d3"
  end

  resource "werkzeug" do
    url "https://files.pythonhosted.org/packages/a4/34/4dd12fc8bb7d61c91467ec3efe415ffa7d5456f799954b40c5bbaeae470e/werkzeug-3.1.9.tar.gz"
    sha256 "55ca7c70a75689be937aa27f8ff4b018f06ff4838fc73045560bf0f5a1291060"
  end

  resource "markupsafe" do
    url "https://files.pythonhosted.org/packages/38/9b/e422a865e1d5d57d0e509b4e0bf1c1a70a7f6382c29a5aa428df994c8bc8/markupsafe-3.0.4.tar.gz"
    sha256 "2e9ad7dd851bf45fab9f75cbff4cb493fee9979e8d8c7c9c3ee119022518edd6"
  end

  resource "platformdirs" do
    url "https://files.pythonhosted.org/packages/71/18/0b0d99f5bf164f04a7a9534c3dbdbe4d5fd2b382667685ad40c192c4d3d1/platformdirs-4.14.8.tar.gz"
    sha256 "96893d686e84e9e6f358a9ea41a8de544df66dbf2ba6cda250e7dc73acf85b9b"
  end

  resource "abstractruntime" do
    url "https://files.pythonhosted.org/packages/49/64/379c64833742eee66c6398d0db86aaa3403023bdf0c46d3dd5f6134d6679/abstractruntime-0.4.25.tar.gz"
    sha256 "cda7c262e0d62bdf3197a97d00c3bc5d7696d9a8fa00fde6afc5163e3ef71593"
  end

  resource "abstractmemory" do
    url "https://files.pythonhosted.org/packages/fd/80/ce46ad3ab5c3d470b712905b01bd5341a071a98e7df6a7fdd8b6d9c3d213/abstractmemory-0.3.2.tar.gz"
    sha256 "4b664b1e362e64873b3a333d05619de5cbd1569fea85f64978c4e86ea0c4fecc"
  end

  resource "abstractsemantics" do
    url "https://files.pythonhosted.org/packages/d0/b1/b3fe0064b2a885663726f4017b4b6bf6d463f875baefcb7bf3ee686a7410/abstractsemantics-0.0.5.tar.gz"
    sha256 "e1eda0e75f212aaca30639b50b2e446a83523e80d79411589ae6925447b36239"
  end

  resource "pyyaml" do
    url "https://files.pythonhosted.org/packages/76/b8/c0b780928e2fb1c87e9e375818c6f121da2398b071012d1747be300b83f4/pyyaml-6.0.4.tar.gz"
    sha256 "e24bf71af8a432d7808fabff134d38dfe16d3cbb41f2873bb4b1e42422de0a1a"
  end

  # What `virtualenv_install_with_resources` does (venv, every resource, then this package),
  # except that apsw is built from a staged copy whose setup.apsw no longer fetches SQLite.
  # If network access during the build is acceptable, the whole body can be
  # `virtualenv_install_with_resources` (apsw then downloads sqlite-src itself).
  def install
    venv = virtualenv_create(libexec, "python3.12")
    venv.pip_install resources.reject { |r| r.name == "apsw" }
    resource("apsw").stage do
      (Pathname.pwd/"setup.apsw").write "[build]\nenable = COLUMN_METADATA\n"
      venv.pip_install Pathname.pwd
    end
    venv.pip_install_and_link buildpath
  end

  service do
    run [opt_bin/"abstractgateway", "serve"]
    environment_variables ABSTRACTGATEWAY_DATA_DIR: var/"abstractgateway"
    keep_alive true
    working_dir var/"abstractgateway"
    log_path var/"log/abstractgateway.log"
    error_log_path var/"log/abstractgateway.log"
  end

  def post_install
    (var/"abstractgateway").mkpath
  end

  test do
    assert_match "abstractgateway #{version}", shell_output("#{bin}/abstractgateway --version")
  end
end
